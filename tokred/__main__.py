from tokred.cli import main

raise SystemExit(main())
