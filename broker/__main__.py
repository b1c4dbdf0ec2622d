from broker.cli import run

run()
