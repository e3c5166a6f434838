#!/usr/bin/env bash
# The SHA-256 of what fastblocks._C is compiled from (csrc/ and setup.py), without git.
cd "$(dirname "$0")/.."
find csrc setup.py -type f | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1
