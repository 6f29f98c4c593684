"""exitcodes - the exit statuses of every relaymilter command (sysexits(3)).

DESCRIPTION
    Admins script against these (DESIGN section 4): one table, used by
    every verb.
"""

EX_OK = 0
EX_ERROR = 1            # anything else: bad input to a store verb, no such entry
EX_USAGE = 64           # bad command line
EX_NOINPUT = 66         # a store or input file that is missing
EX_UNAVAILABLE = 69     # a socket that cannot be opened
EX_SOFTWARE = 70        # a bug: never 1, which some verbs give a meaning
EX_TEMPFAIL = 75        # DNS, a database: try again
EX_NOPERM = 77          # probe --auth: the login was refused
EX_CONFIG = 78          # a bad configuration file

# Verbs that answer with their verdict (DESIGN section 4).
EX_REFUSED = 2          # explain: a recipient would be refused (5xx)
EX_DEFERRED = 3         # explain: a recipient would be deferred (4xx)
EX_LISTED = 2           # lookup: the address is listed
