"""Getting codes and invites to people: email (SMTP + templates), SMS, rate limits.

Nothing here knows about HTTP requests; the service layer calls it.
"""
