from myshop_ops.cli.app import main

main()
