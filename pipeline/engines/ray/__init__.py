"""The Ray engine (`--engine ray`): the driver walks and hands out blocks, workers run the
runner and write their own parts, one quota actor paces the fleet. Ray is an optional extra,
imported only inside these modules' functions, when a Ray run starts."""
