from iosvc.cli import main

main()
