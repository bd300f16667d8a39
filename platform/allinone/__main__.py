from allinone.cli.main import main

main()
