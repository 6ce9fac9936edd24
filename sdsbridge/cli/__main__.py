from sdsbridge.cli import main

main()
