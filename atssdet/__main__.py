from atssdet.cli import main

raise SystemExit(main())
