import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one digit-classifier cache for the whole session, never the user's ~/.cache
os.environ.setdefault("PATCHFLOW_CACHE", tempfile.mkdtemp(prefix="patchflow-test-cache-"))
