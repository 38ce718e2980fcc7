from segm.bench.cli import main

main()
