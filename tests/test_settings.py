"""Settings: defaults that work for the embedded database, one-line errors naming the variable."""

import pytest

from shared_contracts.settings import SettingsError, load_settings
from swamp_app.settings import AppSettings
from swamp_club.settings import LauncherSettings
from telemetry_service.settings import TelemetrySettings


def test_defaults_match_the_documented_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TELEMETRY_PORT", "APP_PORT", "MONGODB_URI", "SWAMP_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert load_settings(TelemetrySettings).port == 8080  # the CLI's default endpoint
    assert load_settings(AppSettings).port == 8000
    assert str(load_settings(LauncherSettings).data_dir) == ".swamp-data"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEMETRY_PORT", "9090")
    monkeypatch.setenv("QUEUE_MAX_ATTEMPTS", "3")
    settings = load_settings(TelemetrySettings)
    assert settings.port == 9090
    assert settings.queue_config().max_attempts == 3


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TELEMETRY_PORT", "eighty"),
        ("TELEMETRY_PORT", "70000"),
        ("MONGODB_URI", "postgres://nope"),
        ("QUEUE_LEASE_SECONDS", "0"),
    ],
)
def test_invalid_setting_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings(TelemetrySettings)
    message = str(raised.value)
    assert message.startswith(f"invalid setting {variable}:")
    assert "\n" not in message


def test_app_settings_name_no_telemetry_database() -> None:
    # I5: the app has no way to address telemetry's database.
    fields = {f.alias or name for name, f in AppSettings.model_fields.items()}
    assert not any("TELEMETRY" in field.upper() for field in fields)


GOOD_TOKEN = "q3J9vX2mK8pL5tR7wY1zB4nC6dF0gH2j"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("short-token", "at least 32 characters"),
        ("changethis-changethis-changethis-x", "placeholder"),
        ("my-admin-secret-for-production-use!", "placeholder"),
        ("a" * 40, "placeholder"),
    ],
)
def test_a_short_or_placeholder_admin_token_is_refused(
    monkeypatch: pytest.MonkeyPatch, token: str, reason: str
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", token)
    with pytest.raises(SettingsError) as raised:
        load_settings(AppSettings)
    message = str(raised.value)
    assert message.startswith("invalid setting ADMIN_TOKEN:")
    assert reason in message
    assert token not in message  # the refused secret is not echoed into logs


def test_an_empty_admin_token_turns_the_admin_api_off_and_a_good_one_is_kept_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", "")
    assert load_settings(TelemetrySettings).admin_token is None
    monkeypatch.setenv("ADMIN_TOKEN", GOOD_TOKEN)
    settings = load_settings(TelemetrySettings)
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == GOOD_TOKEN
    assert GOOD_TOKEN not in repr(settings)
