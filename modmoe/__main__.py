from modmoe.cli import main

main()
