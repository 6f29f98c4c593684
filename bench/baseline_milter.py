"""baseline_milter - the do-nothing milter relaymilter is measured against.

NAME
    baseline_milter - connect, MAIL, RCPT and end-of-message, all CONTINUE

SYNOPSIS
    python bench/baseline_milter.py SOCKET

DESCRIPTION
    The naive milter a first attempt would be: it implements connect, MAIL,
    RCPT and end-of-message, answers CONTINUE to each (ACCEPT at end of
    message) and lets pymilter negotiate every other stage away. It asks for
    no macros and does no work; what it costs the MTA is the price of the
    milter protocol itself.
"""

import sys

import Milter


class BaselineMilter(Milter.Base):
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    def envfrom(self, sender, *params):
        return Milter.CONTINUE

    def envrcpt(self, recipient, *params):
        return Milter.CONTINUE

    def eom(self):
        return Milter.ACCEPT


def main() -> None:
    Milter.factory = BaselineMilter
    Milter.set_flags(0)
    Milter.runmilter("baseline", sys.argv[1], 600, rmsock=True)


if __name__ == "__main__":
    main()
