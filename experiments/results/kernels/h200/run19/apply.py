"""Turns HEAD's chunk_kernels_triton.py into one of run 19's versions: python3 apply.py VERSION.
Each version in versions.json is a list of [old, new] text replacements; every old text must
occur exactly once, so a kernel file that moved on since session 8 is refused, not misedited."""
import json
import os
import sys

KERNELS = "pallas_kernels/common/chunk_kernels_triton.py"
version = sys.argv[1]
edits = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "versions.json")))[version]
text = open(KERNELS).read()
for old, new in edits:
  if text.count(old) != 1:
    sys.exit(f"{version}: expected one occurrence of {old[:80]!r}, found {text.count(old)}")
  text = text.replace(old, new)
open(KERNELS, "w").write(text)
