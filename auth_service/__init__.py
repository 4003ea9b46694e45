"""The authmesh auth service: passwords, tokens, sessions, revocation, signing keys."""
