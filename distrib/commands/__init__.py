"""The commands a user runs: the top floor, which nothing else imports."""
