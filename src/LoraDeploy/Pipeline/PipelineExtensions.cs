namespace LoraDeploy.Pipeline;

public static class PipelineExtensions
{
    public static IServiceCollection AddImportPipeline(this IServiceCollection services)
    {
        services.AddOptions<PipelineOptions>().BindConfiguration(PipelineOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        services.AddSingleton<PipelineSignal>();
        services.AddSingleton<PipelineMetrics>();
        services.AddHostedService<ImportPipeline>();
        return services;
    }
}
