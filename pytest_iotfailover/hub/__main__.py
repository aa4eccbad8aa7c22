from ..fakehub.cli import main

raise SystemExit(main())
