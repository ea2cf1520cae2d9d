from vzpy.cli import main

main()
