#!/usr/bin/env python3
"""A Squid Basic authentication helper for the proxy tests: accepts one user and password,
and appends each check to the attempts file ("basic ok" or "basic wrong").

usage: basic_helper.py USER PASSWORD_FILE ATTEMPTS_FILE
"""

import sys
import urllib.parse


def main() -> None:
    user, password_file, attempts = sys.argv[1:4]
    for line in sys.stdin:
        parts = line.strip().split(" ")
        got_user = urllib.parse.unquote(parts[0]) if parts else ""
        got_password = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ""
        with open(password_file, encoding="utf-8") as f:
            password = f.read().strip()
        good = got_user.lower() == user.lower() and got_password == password
        with open(attempts, "a", encoding="utf-8") as f:
            f.write("basic ok\n" if good else "basic wrong\n")
        print("OK" if good else "ERR", flush=True)


if __name__ == "__main__":
    main()
