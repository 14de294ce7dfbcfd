from tui_app.main import main

main()
