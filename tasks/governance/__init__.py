"""Which model serves: evaluation against the test split and the champion/challenger registry."""
