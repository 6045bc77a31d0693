"""Issue an API token (contract §6):

    python manage.py issue_token USERNAME [--expires-in DAYS]

Creates the user if needed (with no usable password: it signs in with the
token only) and prints the token on the last line. Only its hash is stored.
"""

from django.core.management.base import BaseCommand, CommandError

from sessions_app import tokens
from sessions_app.resources import ID_RE


def positive_days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not value > 0 or value != value or value == float("inf"):
        raise CommandError(f"--expires-in {text!r}: use a positive number of days")
    return value


class Command(BaseCommand):
    help = "Issue an API token for USERNAME (created if needed); the token is the last line."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--expires-in", type=str, default=None, metavar="DAYS",
                            help="the token expires after this many days (default: never)")

    def handle(self, username, expires_in, **options):
        # The username is the caller's resourceId, so it must be a valid id.
        if not ID_RE.fullmatch(username) or len(username) > 150:
            raise CommandError(f"username {username!r} must match [A-Za-z0-9._:-]{{1,128}}")
        days = positive_days(expires_in) if expires_in is not None else None
        raw, row = tokens.issue(username, days)
        expiry = f"expires {row.expires_at.isoformat(timespec='seconds')}" if row.expires_at else "never expires"
        self.stderr.write(f"Token {row.prefix}… for {row.user.username} ({expiry}). "
                          "It is shown once; store it now.")
        self.stdout.write(raw)
