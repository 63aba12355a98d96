"""``vlamp bench``: speed, memory and quality of precision modes, side by side, on this machine."""
