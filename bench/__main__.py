"""`python -m bench`: the harness's commands (`run`, `report`, `list`, see bench/harness.py), and
`gpu`, the whole GPU check (bench/gpu)."""

import sys

if sys.argv[1:2] == ["gpu"]:
    from bench.gpu.run import main

    main(sys.argv[2:])
else:
    from bench.harness import main

    main()
