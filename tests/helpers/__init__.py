"""What the tests share: worker functions run on 2 processes (`mp_workers`, `prune_workers`,
`twrw_workers`), the plain-torch reference (`reference`), random kernel layouts
(`kernel_layouts`), shared checks (`checks`), the golden runs (`golden`) and the RSS probe."""
