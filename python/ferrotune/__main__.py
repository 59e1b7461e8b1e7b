from ferrotune.cli import main

raise SystemExit(main())
