"""`python -m kda_serving.server` is `kda-serve`."""

from kda_serving.server.cli import main

main()
