from lmgen.cli import main

raise SystemExit(main())
