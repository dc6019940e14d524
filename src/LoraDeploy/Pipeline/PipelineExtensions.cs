namespace LoraDeploy.Pipeline;

public static class PipelineExtensions
{
    public static IServiceCollection AddImportPipeline(this IServiceCollection services)
    {
        services.AddOptions<PipelineOptions>().BindConfiguration(PipelineOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        services.AddOptions<PolicyOptions>().BindConfiguration(PolicyOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        services.AddSingleton<PipelineSignal>();
        services.AddSingleton<PipelineMetrics>();
        services.AddSingleton<HuggingFaceTokens>();
        services.AddSingleton<ImportPipeline>();
        services.AddHostedService(sp => sp.GetRequiredService<ImportPipeline>());
        return services;
    }
}
