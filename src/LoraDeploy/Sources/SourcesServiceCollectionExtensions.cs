using System.Net;
using System.Net.Http.Headers;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Http.Resilience;
using Microsoft.Extensions.Options;
using Polly;

namespace LoraDeploy.Sources;

public static class SourcesServiceCollectionExtensions
{
    /// <summary>Name of a general guarded outbound client for sources other than CivitAI.</summary>
    public const string OutboundClientName = "LoraDeploy.Outbound";

    /// <summary>Non-browser product User-Agent: CivitAI answers browsers with HTML, and WAFs block bare library UAs.</summary>
    public static readonly ProductInfoHeaderValue UserAgent = new("LoraDeploy", "0.1");

    /// <summary>Registers the Civitai/HuggingFace/Network/Import options (validated at start) and the guarded HTTP clients.</summary>
    public static IServiceCollection AddSources(this IServiceCollection services, IConfiguration configuration)
    {
        services.TryAddSingleton(TimeProvider.System);
        services.AddOptions<CivitaiOptions>().Bind(configuration.GetSection(CivitaiOptions.SectionName)).ValidateDataAnnotations().ValidateOnStart();
        services.AddOptions<HuggingFaceOptions>().Bind(configuration.GetSection(HuggingFaceOptions.SectionName)).ValidateDataAnnotations().ValidateOnStart();
        services.AddOptions<NetworkOptions>().Bind(configuration.GetSection(NetworkOptions.SectionName)).ValidateDataAnnotations().ValidateOnStart();
        services.AddOptions<ImportOptions>().Bind(configuration.GetSection(ImportOptions.SectionName)).ValidateDataAnnotations().ValidateOnStart();
        services.TryAddSingleton<OutboundConnectGuard>();
        services.TryAddTransient<RedirectHandler>();
        services.TryAddTransient<DownloadAttemptBudgetHandler>();

        services.AddHttpClient<CivitaiClient>().AddGuardedPipeline();
        services.AddHttpClient<CivitaiDownloader>().AddGuardedPipeline();
        services.AddHttpClient<HuggingFaceClient>().AddGuardedPipeline();
        services.AddHttpClient<HuggingFaceDownloader>().AddGuardedPipeline();
        services.AddHttpClient(OutboundClientName).AddGuardedPipeline();
        return services;
    }

    /// <summary>Retry (outermost) → download attempt budget → redirect follower → guarded sockets handler.</summary>
    internal static IHttpClientBuilder AddGuardedPipeline(this IHttpClientBuilder builder)
    {
        builder.ConfigureHttpClient(client =>
        {
            client.DefaultRequestHeaders.UserAgent.Clear();
            client.DefaultRequestHeaders.UserAgent.Add(UserAgent);
            // Attempt timeouts live in the resilience pipeline; body reads have their own idle timeout.
            client.Timeout = Timeout.InfiniteTimeSpan;
        });
        builder.ConfigurePrimaryHttpMessageHandler(sp =>
        {
            var guard = sp.GetRequiredService<OutboundConnectGuard>();
            return new SocketsHttpHandler
            {
                AllowAutoRedirect = false,
                UseCookies = false,
                UseProxy = false, // a proxy would connect on our behalf and bypass the address check
                AutomaticDecompression = DecompressionMethods.None,
                ConnectTimeout = sp.GetRequiredService<IOptions<NetworkOptions>>().Value.ConnectTimeout,
                PooledConnectionLifetime = TimeSpan.FromMinutes(5),
                ConnectCallback = guard.ConnectAsync,
            };
        });
        builder.AddResilienceHandler("retry", static (pipeline, context) =>
        {
            var import = context.ServiceProvider.GetRequiredService<IOptions<ImportOptions>>().Value;
            var time = context.ServiceProvider.GetRequiredService<TimeProvider>();
            if (import.MaxRetryAttempts > 0)
            {
                pipeline.AddRetry(new HttpRetryStrategyOptions
                {
                    ShouldRetryAfterHeader = false, // replaced by our own generator below, which caps the wait
                    MaxRetryAttempts = import.MaxRetryAttempts,
                    BackoffType = DelayBackoffType.Exponential,
                    UseJitter = true,
                    Delay = import.RetryBaseDelay,
                    MaxDelay = import.RetryMaxDelay,
                    DelayGenerator = args => ValueTask.FromResult(RetryAfterDelay(args.Outcome.Result, time, import.RetryMaxDelay)),
                });
            }
            pipeline.AddTimeout(import.AttemptTimeout);
        });
        builder.AddHttpMessageHandler<DownloadAttemptBudgetHandler>();
        builder.AddHttpMessageHandler<RedirectHandler>();
        return builder;
    }

    /// <summary>The wait a 429/503 asked for, capped; null lets the exponential backoff decide.</summary>
    internal static TimeSpan? RetryAfterDelay(HttpResponseMessage? response, TimeProvider time, TimeSpan cap)
    {
        var retryAfter = response?.Headers.RetryAfter;
        TimeSpan? wait = retryAfter?.Delta ?? (retryAfter?.Date is { } date ? date - time.GetUtcNow() : null);
        if (wait is not { } w)
        {
            return null;
        }
        return w < TimeSpan.Zero ? TimeSpan.Zero : w > cap ? cap : w;
    }
}
