from cdka_search.cli.app import main

main()
