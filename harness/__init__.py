"""Development harness shared by tests/ and bench/: boots the real ComfyUI host (in-process or as
a server) and builds tiny random-weight models through ComfyUI's own model classes.  Never
imported by the pack at run time."""
