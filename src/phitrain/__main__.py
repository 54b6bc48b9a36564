from phitrain.cli import main

raise SystemExit(main())
