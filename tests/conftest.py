import sys
from pathlib import Path

# make the test oracles in tests/ importable as plain modules
sys.path.insert(0, str(Path(__file__).parent))
