"""Container health check: the daemon's main loop ran recently.

The coordinator and the worker touch ``$ELASTIC_HEALTH_FILE`` from their main loop
(at most once a second); a file older than ``$ELASTIC_HEALTH_MAX_AGE`` seconds
(default 30) means the loop is stuck. Exit 0 healthy, 1 not.
"""

import os
import sys
import time

path = os.environ.get("ELASTIC_HEALTH_FILE", "/tmp/elastic-alive")
max_age = float(os.environ.get("ELASTIC_HEALTH_MAX_AGE", "30"))
try:
    age = time.time() - os.stat(path).st_mtime
except FileNotFoundError:
    print(f"unhealthy: {path} does not exist (not started yet?)")
    sys.exit(1)
if age > max_age:
    print(f"unhealthy: main loop last ran {age:.0f}s ago")
    sys.exit(1)
print(f"healthy: main loop ran {age:.1f}s ago")
