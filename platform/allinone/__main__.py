from allinone.cli import main

main()
