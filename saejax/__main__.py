from saejax.cli import run

run()
