"""Revoke API tokens:

    python manage.py revoke_token PREFIX        # the token (or its first characters) shown by the admin
    python manage.py revoke_token --user NAME   # every live token of a user
"""

from django.core.management.base import BaseCommand, CommandError

from sessions_app import tokens


class Command(BaseCommand):
    help = "Revoke API tokens by prefix (or the whole token) and/or by username."

    def add_arguments(self, parser):
        parser.add_argument("prefix", nargs="?", default=None)
        parser.add_argument("--user", dest="username", default=None)

    def handle(self, prefix, username, **options):
        if not prefix and not username:
            raise CommandError("name a token prefix or --user USERNAME")
        if prefix and len(prefix) < len(tokens.TOKEN_PREFIX) + 4:
            raise CommandError(f"prefix {prefix!r} is too short: give at least "
                               f"{len(tokens.TOKEN_PREFIX) + 4} characters (e.g. as the admin shows it)")
        count = tokens.revoke(prefix=prefix, username=username)
        if count == 0:
            raise CommandError("no live token matches")
        self.stdout.write(f"revoked {count} token(s)")
