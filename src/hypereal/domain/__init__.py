"""Business rules: keys, ledger, pricing, catalogue, rate limits. No HTTP here."""
