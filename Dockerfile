# One image for both services; the command picks the role (see docker-compose.yml).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv/swamp-club
COPY pyproject.toml constraints.txt README.md ./
COPY shared_contracts ./shared_contracts
COPY telemetry_service ./telemetry_service
COPY swamp_app ./swamp_app
COPY swamp_club ./swamp_club
# No [embedded] extra: production talks to a real MongoDB replica set.
RUN pip install -c constraints.txt . && useradd --system --uid 10001 swamp
USER swamp
ENTRYPOINT ["swamp-club"]
