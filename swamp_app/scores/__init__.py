"""UserScore: the scoring formula (pure), the repository, the score-refresh consumer, the API."""
