"""The engine's constants, torch-free, so that `flashnb --help` and its option defaults load in a blink.

Every default in flashnb (the engine's policy, the bench, the CLI, the replay, the cost model, the
device profile) takes its value from here.
"""

from __future__ import annotations

# Reads kept in flight: the native AIO queue depth (reader threads where native AIO is unavailable).
IN_FLIGHT = 64

# Every FFN region of a store starts on a multiple of this many bytes, so direct I/O can read it.
ALIGNMENT = 4096

# The reader merges two neighbouring spans into one request when at most this many unneeded bytes lie
# between them. A device profile's break-even gap (latency x bandwidth) comes from a fit that is least
# certain for small reads, so a gap taken from a profile is capped here (bytes). Measured on the shipped
# model (engine runs taking turns, 24 tokens, virtio disk, 64 in flight): a 16 KiB gap read 2.5-5x the
# needed bytes and cost 1-3.6 ms a token against no gap; 4 KiB was within noise of no gap while saving
# 13-25% of the requests.
MAX_PROFILE_GAP = 4 * 1024

# Longer merged requests are split into pieces of at most this many bytes.
MAX_REQUEST_BYTES = 1 << 20

# The paper's half-memory setting: the weights held in DRAM may take this share of the model's bytes.
MEMORY_BUDGET = 0.5

# Tokens whose neurons stay cached (the paper's k: 4-5).
WINDOW = 4

# The shipped model's prompt for `flashnb demo` and `flashnb bench`.
DEMO_PROMPT = "Return a new list containing"
