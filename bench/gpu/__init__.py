"""The whole GPU check in one process tree: `python -m bench gpu [--out DIR] [--dry-run]`.

`run` is the parent: it runs each phase of `config.PHASES` in a child process of its own with a
timeout (`phases` is the child's side), within one deadline, and writes JSON and markdown
(`report`). `trace` summarizes a profiler trace. README.md says how to run it on the GPU machine.
"""
