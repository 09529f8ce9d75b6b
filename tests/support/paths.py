"""Where things are, for tests anywhere under tests/ (they live one or two levels down)."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent     # tests/
ROOT = TESTS.parent                                 # the checkout
DATA = TESTS / "data"                               # committed fixtures
SUPPORT = TESTS / "support"                         # helpers and scripts the tests run
