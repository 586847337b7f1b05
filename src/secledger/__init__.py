"""secledger: a tamper-evident ledger of security code reviews from GitLab webhooks."""

__version__ = "0.1.0"
