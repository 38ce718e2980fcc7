from segm.export.cli import main

main()
