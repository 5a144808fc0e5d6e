from tiny_models.match_grid.cli import main

main()
