import os
import sys

# The plain reference implementations in this folder are imported by the tests as modules.
sys.path.insert(0, os.path.dirname(__file__))
