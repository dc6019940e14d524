-- wrk -s bench/many_callers.lua: every request is one of bench/many_callers.py's 256 callers, picked at random,
-- asking for one of its 10 deploys (BENCH_KIND=deploy) or its list (BENCH_KIND=list). Tokens from BENCH_CALLERS.
local tokens = {}
for line in io.lines(os.getenv("BENCH_CALLERS")) do tokens[#tokens + 1] = line end
local kind = os.getenv("BENCH_KIND") or "deploy"
math.randomseed(os.time() + math.floor(os.clock() * 1e6))

request = function()
  local caller = math.random(0, #tokens - 1)
  local path = kind == "list" and "/deploy/list" or string.format("/deploy/pl%06d%d", caller, math.random(0, 9))
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. tokens[caller + 1] })
end
