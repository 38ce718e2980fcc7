from segm.train.cli import main

main()
