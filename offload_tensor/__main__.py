"""`python -m offload_tensor`: the offload-tensor command."""

from offload_tensor.cli import main

main()
