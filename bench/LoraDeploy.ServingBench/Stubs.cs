namespace LoraDeploy.ServingBench;

public static class AffinityBench { public static Task RunAsync(int rounds, int requests, int concurrency, int adapters, int maxAdaptersPerWorker) => Task.CompletedTask; }
public static class PlacementBench { public static Task RunAsync(int runs, int heartbeatSeconds) => Task.CompletedTask; }
public static class LlamaCppBench { public static Task RunAsync(int rounds, int tokens, int bigAdapterMiB) => Task.CompletedTask; }
